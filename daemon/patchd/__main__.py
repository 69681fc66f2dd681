from patchd.cli.main import main

raise SystemExit(main())
