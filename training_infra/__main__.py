"""`python -m training_infra`: the same command as the `training-infra` console script."""

from training_infra.cli.main import main

if __name__ == "__main__":
    main()
