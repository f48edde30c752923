from delinea.demo.run import main

main()
