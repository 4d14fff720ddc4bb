from sparsefold.cli import main

raise SystemExit(main())
