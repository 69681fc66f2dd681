from patchd.cli import main

raise SystemExit(main())
