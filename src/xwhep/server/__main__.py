from xwhep.server.cli import main

main()
