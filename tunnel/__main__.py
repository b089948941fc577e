from tunnel.app.cli import main

raise SystemExit(main())
