"""Detection's geometry and objectives: box ops (`boxes`), Hungarian matching (`matching`) and the set losses
(`losses`)."""
