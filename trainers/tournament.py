"""`python -m trainers.tournament ...`: the entrypoint G.O.D's tournament runs in our image.

The contract names this module, so it lives here; the pipeline it runs (cache lookup, plan,
fit, export) is the miner's own, in `cluster.jobs.tournament`. This entry point is the one place
where `trainers` reaches up the stack, and only at run time.
"""
import sys

if __name__ == "__main__":
    from cluster.jobs.tournament import main

    sys.exit(main())
