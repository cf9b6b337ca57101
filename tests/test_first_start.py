"""What a new user trips on at first start, and what the service then says."""

from __future__ import annotations

import shlex

import pytest

from conftest import SCRIPTED
from modelpool import ConfigError, PoolConfig, open_pool
from modelpool.options import command

# -- the model command as one string ----------------------------------------------------


async def test_a_command_string_in_pool_config_is_split_as_the_cli_does() -> None:
    text = f"{shlex.quote(SCRIPTED[0])} -u '{SCRIPTED[2]}'"
    config = PoolConfig(model_cmd=text)
    assert config.model_cmd == command(text) == SCRIPTED
    assert PoolConfig(model_cmd="python3 -u 'my model.py'").model_cmd == [
        "python3",
        "-u",
        "my model.py",
    ]
    async with open_pool(PoolConfig(model_cmd=text, workers=1)) as pool:
        assert (await pool.predict({"n": 1}))["echo"] == {"n": 1}


@pytest.mark.parametrize(
    "value",
    ["", "   ", "python3 'unclosed", [], [""], ["python3", 3], 5, None, {"python3": "x"}],
)
def test_a_model_command_that_is_no_list_of_strings_is_refused_at_once(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        PoolConfig(model_cmd=value)  # type: ignore[arg-type]
    assert raised.value.field == "model_cmd"
