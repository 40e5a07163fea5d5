"""`python -m megatron_nullmoe.generate`, the command line users type; the code is in
megatron_nullmoe/inference/generate.py, beside the other inference commands."""

from megatron_nullmoe.inference.generate import main

if __name__ == "__main__":
    main()
