from gencli.cli.main import main

main()
