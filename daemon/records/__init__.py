"""The records directory and everything built on it (SPEC.md "Record").

    records_dir/
      <UTC stamp>_<model>_<id>.json   one exchange (the source of truth)
      <UTC stamp>_<model>_<id>.md     its Markdown twin, for people (bodies, auth masked)
      system/<sha256>.txt             each distinct system prompt, once
      index.sqlite                    the SQLite index (WAL), rebuilt from the files by `reindex`
      archive/<name>.json.gz          rotated records (oldest 20% past records.max_files)
      archive/YYYY-MM.tar.gz          archived records older than records.archive_after_days
"""
