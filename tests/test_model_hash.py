import hashlib

from cluster.jobs.model_hash import calculate_model_hash, is_valid_hash


def _write(folder, files):
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_hash_follows_god_definition(tmp_path):
    _write(tmp_path, {"adapter_model.safetensors": b"W", "adapter_config.json": b"{}", "model-00001-of-00002.safetensors": b"S"})
    expected = hashlib.sha256()
    for rel, data in sorted({"adapter_config.json": b"{}", "adapter_model.safetensors": b"W",
                             "model-00001-of-00002.safetensors": b"S"}.items()):
        expected.update(f"{rel}:{hashlib.sha256(data).hexdigest()}".encode())
    assert calculate_model_hash(tmp_path) == expected.hexdigest()
    assert is_valid_hash(calculate_model_hash(tmp_path))


def test_tokenizer_readme_and_empty_files_do_not_count(tmp_path):
    _write(tmp_path, {"adapter_model.safetensors": b"W", "adapter_config.json": b"{}"})
    before = calculate_model_hash(tmp_path)
    _write(tmp_path, {"tokenizer.json": b"tok", "README.md": b"hi", "config.json": b"",
                      "last-checkpoint/adapter_model.safetensors": b"X"})
    assert calculate_model_hash(tmp_path) == before


def test_weights_change_the_hash_and_no_candidates_gives_none(tmp_path):
    _write(tmp_path, {"model.safetensors": b"A"})
    a = calculate_model_hash(tmp_path)
    _write(tmp_path, {"model.safetensors": b"B"})
    assert calculate_model_hash(tmp_path) != a
    empty = tmp_path / "empty"
    empty.mkdir()
    assert calculate_model_hash(empty) is None
