"""The wire format: frames, the DTLS session and its cookies, certificate checks, ECN, ICMP, MTU math."""
