from kvtier.engine.cli import main

raise SystemExit(main())
