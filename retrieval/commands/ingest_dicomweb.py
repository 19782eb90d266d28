"""`casebase ingest-dicomweb URL --out MANIFEST`: a PHI-free manifest from a DICOMweb server."""

from __future__ import annotations


def run(args) -> int:
    from retrieval.data.dicomweb import DEFAULT_TIMEOUT, auth_from_args, ingest_dicomweb

    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT
    if timeout <= 0 or (getattr(args, "workers", None) or 1) < 1:
        from retrieval.errors import CasebaseError

        raise CasebaseError("--timeout must be positive and --workers at least 1")
    auth = auth_from_args(
        getattr(args, "username", None),
        getattr(args, "password_env", None),
        getattr(args, "token_env", None),
    )
    report = ingest_dicomweb(
        args.url,
        args.out,
        studies=args.study or (),
        label_from=args.label_from,
        cache=args.cache,
        auth=auth,
        strict=args.strict,
        timeout=timeout,
        workers=getattr(args, "workers", None) or 4,
    )
    labels = ", ".join(f"{k}: {v}" for k, v in report.labels.items())
    splits = ", ".join(f"{k}: {v}" for k, v in report.splits.items())
    print(f"wrote {report.manifest} (labels {{{labels}}}, splits {{{splits}}})")
    print(report.summary())
    return 0
