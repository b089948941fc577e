"""A UDP relay that flips one bit in every Nth DTLS application-data record.

Run inside a lab namespace between client and server to model corruption on
the wire:  python udp_mangler.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT EVERY COUNT_FILE [BIG]
Records client->server of content type 23 are counted; every EVERY-th gets the
last byte (inside the AEAD tag) flipped.  COUNT_FILE keeps the number flipped
so far and, after a space, how many of them were at least BIG bytes long (so a
test can tell its own large packets from small keepalive probes).
"""

import selectors
import socket
import sys


def main() -> None:
    lhost, lport, thost, tport, every, count_file = sys.argv[1:7]
    every = int(every)
    big = int(sys.argv[7]) if len(sys.argv) > 7 else 1 << 16
    target = (thost, int(tport))
    down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    down.bind((lhost, int(lport)))
    sel = selectors.DefaultSelector()
    sel.register(down, selectors.EVENT_READ, None)
    ups: dict = {}
    seen = flipped = flipped_big = 0
    while True:
        for key, _ in sel.select():
            sock, client = key.fileobj, key.data
            data, addr = sock.recvfrom(65535)
            if client is not None:  # server -> client
                down.sendto(data, client)
                continue
            up = ups.get(addr)
            if up is None:
                up = ups[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.connect(target)
                sel.register(up, selectors.EVENT_READ, addr)
            if data[0] == 23:
                seen += 1
                if seen % every == 0:
                    data = data[:-1] + bytes([data[-1] ^ 0x01])
                    flipped += 1
                    flipped_big += len(data) >= big
                    with open(count_file, "w") as f:
                        f.write(f"{flipped} {flipped_big}")
            up.send(data)


if __name__ == "__main__":
    main()
