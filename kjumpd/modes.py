"""The hibernation modes (what happens once the image is saved), importable without the
config module: kjumpctl builds its --mode choices from this at every start, and kjumpd.config
(tomllib, dataclasses) costs ~0.5 s of a TCG guest's kjumpctl start-up."""

MODES = ("platform", "shutdown", "reboot", "suspend", "test", "checkpoint")
