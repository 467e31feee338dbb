from starfish.cli import main

raise SystemExit(main())
