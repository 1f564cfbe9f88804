"""Proxy CLI flags: the fixed interface parses into a ProxyConfig, bad values exit with a usage error."""
import pytest

from gridserve.proxy.config import ProxyConfig, parse_config


def test_fixed_interface_flags_parse_with_defaults_for_the_rest():
    cfg = parse_config(["--head", "127.0.0.1:50051", "--host", "0.0.0.0", "--port", "0",
                        "--port-file", "/tmp/p.port"])
    assert cfg == ProxyConfig(head="127.0.0.1:50051", host="0.0.0.0", port=0, port_file="/tmp/p.port")
    assert cfg.max_body_bytes == 1024 * 1024 and cfg.retry_attempts == 3 and cfg.log_level == "INFO"


@pytest.mark.parametrize("argv,needle", [
    ([], "--head"),
    (["--head", "nocolon"], "expected HOST:PORT"),
    (["--head", "h:99999"], "port in 1..65535"),
    (["--head", "h:1", "--port", "70000"], "--port: must be in 0..65535"),
    (["--head", "h:1", "--log-level", "loud"], "--log-level"),
    (["--head", "h:1", "--retry-attempts", "0"], "--retry-attempts"),
])
def test_bad_flags_exit_2_with_a_message_naming_the_problem(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
