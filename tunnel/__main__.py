from tunnel.cli import main

raise SystemExit(main())
