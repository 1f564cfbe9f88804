"""Proxy CLI flags: the fixed interface parses into a ProxyConfig, bad values exit with a usage error."""
import pytest

from gridserve.proxy.settings import ProxyConfig, parse_config


def test_fixed_interface_flags_parse_with_defaults_for_the_rest():
    cfg = parse_config(["--head", "127.0.0.1:50051", "--host", "0.0.0.0", "--port", "0",
                        "--port-file", "/tmp/p.port"])
    assert cfg == ProxyConfig(head="127.0.0.1:50051", host="0.0.0.0", port=0, port_file="/tmp/p.port")
    assert cfg.max_body_bytes == 1024 * 1024 and cfg.retry_attempts == 3 and cfg.log_level == "INFO"
    assert cfg.accept_timeout_s == 5.0 and cfg.max_failovers == 3


def test_accept_timeout_and_max_failovers_reach_the_config():
    cfg = parse_config(["--head", "h:1", "--accept-timeout", "0.5", "--max-failovers", "0"])
    assert cfg.accept_timeout_s == 0.5 and cfg.max_failovers == 0


def test_routing_is_prefix_by_default_and_p2c_turns_affinity_off():
    assert parse_config(["--head", "h:1"]).routing == "prefix"
    assert parse_config(["--head", "h:1", "--routing", "P2C"]).routing == "p2c"


@pytest.mark.parametrize("argv,needle", [
    ([], "--head"),
    (["--head", "nocolon"], "expected HOST:PORT"),
    (["--head", "h:99999"], "port in 1..65535"),
    (["--head", "h:1", "--port", "70000"], "--port: must be in 0..65535"),
    (["--head", "h:1", "--log-level", "loud"], "--log-level"),
    (["--head", "h:1", "--retry-attempts", "0"], "--retry-attempts"),
    (["--head", "h:1", "--accept-timeout", "0"], "--accept-timeout: must be > 0"),
    (["--head", "h:1", "--accept-timeout", "nan"], "--accept-timeout: must be > 0"),
    (["--head", "h:1", "--max-failovers", "-1"], "--max-failovers: must be >= 0"),
    (["--head", "h:1", "--routing", "random"], "--routing: must be one of prefix, p2c, got 'random'"),
])
def test_bad_flags_exit_2_with_a_message_naming_the_problem(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_api_keys_come_from_flags_and_files_and_stay_out_of_the_repr(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-file-0001\n\nsk-flag-0002\n")
    cfg = parse_config(["--head", "h:1", "--api-key", "sk-flag-0002", "--api-key-file", str(keys)])
    assert cfg.api_keys == ("sk-flag-0002", "sk-file-0001")
    assert "sk-" not in repr(cfg)


@pytest.mark.parametrize("content,needle", [("", "holds no key"), ("# only a comment\n", "holds no key"),
                                            ("short\n", "at least 8")])
def test_bad_key_files_are_refused(tmp_path, capsys, content, needle):
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(SystemExit):
        parse_config(["--head", "h:1", "--api-key-file", str(keys)])
    assert needle in capsys.readouterr().err


def test_the_key_file_the_head_writes_is_0600_and_removed_when_there_are_no_keys(tmp_path):
    from gridserve.common.api_key_files import read_key_file, write_key_file

    path = tmp_path / "state" / "api-keys"
    write_key_file(path, ("sk-aaaaaaaa", "sk-bbbbbbbb"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path) == ["sk-aaaaaaaa", "sk-bbbbbbbb"]
    write_key_file(path, ())
    assert not path.exists()
