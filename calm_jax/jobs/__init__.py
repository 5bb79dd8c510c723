"""The jobs behind the commands (train, decode, calibrate, demo, report,
validity, bench, convert): gin configurables and drivers of the library.
The commands themselves (calm_jax/<job>.py) only parse the command line."""
