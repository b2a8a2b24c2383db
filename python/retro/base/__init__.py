"""What every stage uses: the user's error, argument checks, the shared defaults, files written
atomically and read with clear errors, interrupts, the options dataclasses' flags, the process group."""
