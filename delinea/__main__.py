from delinea.main import main

main()
