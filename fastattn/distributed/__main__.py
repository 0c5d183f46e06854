import sys

from fastattn.distributed.bench import main

sys.exit(main())
