"""flaxdet_converters: checkpoint I/O and visdet <-> Flax conversion."""
