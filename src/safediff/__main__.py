from safediff.cli import main

main()
