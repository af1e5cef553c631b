from ihld.cli import main

raise SystemExit(main())
