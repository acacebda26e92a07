from xwhep.worker.cli import main

main()
