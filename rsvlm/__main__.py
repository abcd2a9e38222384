from rsvlm.cli import main

raise SystemExit(main())
