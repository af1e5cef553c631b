from ihld.cli.main import main

raise SystemExit(main())
