from medfound.cli import main

main()
