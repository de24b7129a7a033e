from host.cli.main import main

main()
