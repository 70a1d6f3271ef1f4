from attnrs.cli import main

raise SystemExit(main())
