"""Layer: results (above config; imports emulator.config and tpicore only). The results line as typed records
and what reads it back for people:

    record.py       RunRecord / AllreduceRecord: the one builder path, the one writer (append_record,
                    a whole line per write) and the one reader (read_records, record_from_json); the schema
    report.py       the summary table printed after a run config
    provenance.py   host description, git commit, UTC time (recorded in every line)

Must not import emulator.net, host, run, figures or cli, nor run anything.
"""
