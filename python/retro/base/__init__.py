"""What every stage uses: the user's error, argument checks, atomic files, interrupts, the
options dataclasses' flags, the process group, the shared defaults."""
