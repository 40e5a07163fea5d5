"""`python -m megatron_nullmoe.evaluate`, the command line users type; the code is in
megatron_nullmoe/inference/evaluate.py, beside the other inference commands."""

from megatron_nullmoe.inference.evaluate import main

if __name__ == "__main__":
    main()
