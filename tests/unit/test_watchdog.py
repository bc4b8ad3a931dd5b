"""kjumpd.agent.watchdog: a stalled save kernel stops feeding its watchdog; a working one
never does, and it always stops the timer before jumping."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from kjumpd.agent import watchdog
from kjumpd.agent.kernel_role import Progress, parse_cmdline
from kjumpd.daemon import config as cfgmod
from kjumpd.errors import AgentError, ConfigError
from kjumpd.sysroot import Sysroot


class FakeDevice:
    """A watchdog device that accepts timeouts up to ``max_timeout``."""

    name = "fake"

    def __init__(self, max_timeout: int = 2046) -> None:
        self.max_timeout = max_timeout
        self.timeout = 0
        self.feeds = 0
        self.disarmed = False
        self.fed = threading.Event()

    def set_timeout(self, seconds: int) -> int:
        if seconds > self.max_timeout:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.timeout = seconds
        return seconds

    def keepalive(self) -> None:
        self.feeds += 1
        self.fed.set()

    def disarm(self) -> None:
        self.disarmed = True


def test_hardware_timeout_is_capped_and_backs_off_for_small_devices() -> None:
    assert watchdog.hardware_timeouts(120)[0] == watchdog.HARDWARE_TIMEOUT_MAX
    assert watchdog.hardware_timeouts(10)[0] == 10
    assert watchdog.hardware_timeouts(120)[-1] >= watchdog.HARDWARE_TIMEOUT_MIN
    dev = FakeDevice(max_timeout=5)
    wd = watchdog.Watchdog(dev, stall=120)
    armed = wd.arm()
    wd.disarm()
    assert (
        armed is not None and armed.hardware_timeout <= 5 and dev.timeout == armed.hardware_timeout
    )


def test_a_device_that_takes_no_timeout_is_not_armed() -> None:
    dev = FakeDevice(max_timeout=1)
    assert watchdog.Watchdog(dev, stall=60).arm() is None
    assert dev.feeds == 0


def test_feeding_stops_once_the_work_stalls() -> None:
    assert watchdog.should_feed(now=100.0, last_progress=95.0, stall=10)
    assert not watchdog.should_feed(now=100.0, last_progress=90.0, stall=10)


def test_the_thread_really_stops_feeding_after_a_stall(monkeypatch) -> None:
    monkeypatch.setattr(watchdog, "feed_interval", lambda _t: 0.01)
    now = [0.0]
    dev = FakeDevice()
    wd = watchdog.Watchdog(dev, stall=10, clock=lambda: now[0])
    wd.arm()
    deadline = time.monotonic() + 2
    while dev.feeds < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.feeds >= 3  # fed while the work is fresh
    now[0] = 11.0  # no progress for longer than the stall
    wd._thread.join(2)  # type: ignore[union-attr]
    assert not wd._thread.is_alive()  # type: ignore[union-attr]
    stalled_at = dev.feeds
    time.sleep(0.05)
    assert dev.feeds == stalled_at
    wd.disarm()
    assert dev.disarmed


def test_progress_feeds_only_when_the_work_advances() -> None:
    class Counter:
        n = 0

        def progress(self) -> None:
            self.n += 1

    c = Counter()
    p = Progress("saving", 1 << 30, every=3600, watchdog=c)
    p(0)
    p(0)  # the pipeline's meter while it waits for a chunk: no progress
    p(0)
    p(1 << 20)
    p(1 << 20)
    p(2 << 20)
    assert c.n == 3


def test_no_device_says_a_hang_needs_a_power_cycle(tmp_path) -> None:
    lines: list[str] = []
    assert watchdog.start(Sysroot(tmp_path), 120, lines.append) is None
    assert "power cycle" in lines[0]
    assert watchdog.start(Sysroot(tmp_path), 0, lines.append) is None
    assert len(lines) == 1  # switched off: not even looked for


def test_the_command_line_word_reaches_the_agent() -> None:
    assert parse_cmdline("kjump.role=save kjump.watchdog=120").watchdog == 120
    assert parse_cmdline("kjump.role=restore kjump.watchdog=0").watchdog == 0
    assert parse_cmdline("kjump.role=save").watchdog == 0
    with pytest.raises(AgentError, match="kjump.watchdog"):
        parse_cmdline("kjump.role=save kjump.watchdog=soon")


def test_config_puts_the_watchdog_on_the_save_kernels_command_line(tmp_path) -> None:
    c = cfgmod.Config()
    assert "kjump.watchdog=120" in c.save_kernel_append().split()
    off = cfgmod.Config(save_kernel_watchdog=0)
    assert "kjump.watchdog" not in off.save_kernel_append()


@pytest.mark.parametrize("value", [5, -1, True, 1.5, "120", 86401])
def test_config_refuses_a_watchdog_that_would_fire_on_a_pause_or_is_not_seconds(
    tmp_path, value
) -> None:
    conf = tmp_path / "etc/kjumpd/kjumpd.toml"
    conf.parent.mkdir(parents=True)
    shown = f'"{value}"' if isinstance(value, str) else str(value).lower()
    conf.write_text(f"[save_kernel]\nwatchdog = {shown}\n")
    with pytest.raises(ConfigError, match="watchdog") as e:
        cfgmod.load(Sysroot(tmp_path))
    assert "120" in (e.value.fix or "")


@pytest.mark.parametrize("value", [0, 10, 600])
def test_config_takes_a_watchdog_of_zero_or_ten_seconds_and_more(tmp_path, value) -> None:
    conf = tmp_path / "etc/kjumpd/kjumpd.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[save_kernel]\nwatchdog = {value}\n")
    assert cfgmod.load(Sysroot(tmp_path)).save_kernel_watchdog == value
