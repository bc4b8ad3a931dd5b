"""Suspend-to-both decisions (pure) and battery estimates."""

import pytest

from kjumpd.daemon.battery import Battery
from kjumpd.daemon.platform import decide

NOW = 1_764_000_000


def bat(percent=50.0, left=3600.0, ac=False, discharging=True, present=True):
    return Battery(present, ac, percent, discharging, left)


def test_on_ac_or_without_battery_stay_in_ram_without_alarm():
    d = decide(bat(ac=True, discharging=False), NOW, 10, 300, None)
    assert d.action == "sleep" and d.alarm is None and "AC" in d.why
    d = decide(Battery(False, False, None, False, None), NOW, 10, 300, None)
    assert d.action == "sleep" and d.alarm is None and "no battery" in d.why


def test_alarm_at_the_time_the_battery_reaches_the_floor():
    d = decide(bat(50, 3600), NOW, 10, 300, None)
    assert d.action == "sleep" and d.alarm == NOW + 2880  # 40% of 50% of an hour


def test_alarm_is_never_sooner_than_the_rearm_minimum():
    d = decide(bat(10.5, 3600), NOW, 10, 300, None)  # floor in 171 s
    assert d.alarm == NOW + 300


def test_below_the_floor_powers_off_at_once():
    assert decide(bat(9), NOW, 10, 300, None).action == "poweroff"
    # after an alarm wake, a low battery powers off (the image is already saved)
    assert decide(bat(9), NOW + 5000, 10, 300, NOW + 4000).action == "poweroff"


def test_alarm_wake_with_enough_battery_rearms():
    d = decide(bat(30, 1000), NOW + 4000, 10, 300, NOW + 4000)
    assert d.action == "sleep" and d.alarm == NOW + 4000 + 666


def test_wake_before_the_alarm_is_the_user():
    assert decide(bat(30), NOW + 10, 10, 300, NOW + 4000).action == "woke"


@pytest.mark.parametrize("floor", [0, 5, 50, 100])
def test_seconds_to_floor(floor):
    b = bat(50, 1000)
    s = b.seconds_to_floor(floor)
    if floor >= 50:
        assert s == 0
    else:
        assert s == pytest.approx(1000 * (50 - floor) / 50)
