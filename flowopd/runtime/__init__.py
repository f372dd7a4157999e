"""How stages run: artifact folders written atomically with their provenance, run records, launching one or several
processes, and the data-parallel split of a batch over them. No torch at import (the data stage never needs it)."""
