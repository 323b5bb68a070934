"""Prompt lists at a URI: a text file (one prompt per line) or a parquet file with a `prompt` or `caption` column."""


from sidflow import storage


def read_prompts(uri: str) -> list[str]:
    """Return the non-empty prompts stored at `uri`; raise a one-line ValueError if there are none."""
    if uri.endswith(".parquet"):
        table = storage.parquet_table(storage.read_bytes(uri))
        column = next((c for c in ("prompt", "caption", "text") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"prompt file {uri} has no 'prompt' or 'caption' column (columns: {table.column_names})")
        prompts = [str(p).strip() for p in table.column(column).to_pylist() if p is not None]
    else:
        prompts = [line.strip() for line in storage.read_text(uri).splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {uri} holds no prompts")
    return prompts
