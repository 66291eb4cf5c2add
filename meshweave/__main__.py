from meshweave.cli import main

raise SystemExit(main())
