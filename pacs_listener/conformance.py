"""The DICOM Conformance Statement of ``dicom-covid serve``, generated from the code.

:func:`render` writes ``docs/conformance.md`` in the structure of DICOM PS3.2 (overview,
implementation model, AE specifications, communication profiles, extensions, configuration,
character sets, security, the SR and SC content). Every table is built from what the service
actually uses: the SCP's presentation contexts (:func:`pacs_listener.scp.supported_contexts`),
the SCU's proposals (:func:`pacs_listener.sender.proposed_transfer_syntaxes`), the limits and
timeouts (defaults of :class:`~pacs_listener.config.ScpConfig`, :class:`SenderConfig`,
:class:`RetryPolicy`, :class:`ServiceConfig`), the C-STORE statuses
(:data:`pacs_listener.scp.STATUS_CODES`), the character sets pydicom decodes, and the coded
concepts of :mod:`dicom_covid.results.codes`. ``tests/test_conformance.py`` fails when the
committed document differs from :func:`render`; regenerate it with
``dicom-covid conformance --output docs/conformance.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

__all__ = ["LIMITS", "REJECTIONS", "render"]

#: The limits and timeouts the statement lists: (config class, field, meaning, unit).
LIMITS: tuple[tuple[str, str, str, str], ...] = (
    ("ScpConfig", "maximum_associations", "concurrent negotiated associations (SCP)", ""),
    (
        "ScpConfig",
        "maximum_pending",
        "connections not yet associated, in total (the oldest is dropped first)",
        "",
    ),
    ("ScpConfig", "maximum_pending_per_peer", "... per peer IP address", ""),
    (
        "ScpConfig",
        "associate_timeout",
        "connection to complete A-ASSOCIATE-RQ (TLS handshake included)",
        "s",
    ),
    ("ScpConfig", "maximum_associate_rq_size", "largest A-ASSOCIATE-RQ PDU accepted", "bytes"),
    (
        "ScpConfig",
        "maximum_pdu_size",
        "Maximum Length announced by the SCP (0: unlimited)",
        "bytes",
    ),
    ("ScpConfig", "pdu_timeout", "silence in the middle of a PDU", "s"),
    ("ScpConfig", "acse_timeout", "ARTIM / association messages (SCP)", "s"),
    ("ScpConfig", "dimse_timeout", "DIMSE messages (SCP)", "s"),
    ("ScpConfig", "network_timeout", "idle association closed after", "s"),
    ("ScpConfig", "maximum_image_pixels", "rows x columns x frames of an image analysed", ""),
    ("ScpConfig", "maximum_image_bytes", "decoded size of an image analysed", "bytes"),
    ("ScpConfig", "min_free_bytes", "free disk kept by the SCP (else 0xA700)", "bytes"),
    ("SenderConfig", "acse_timeout", "association messages (SCU)", "s"),
    ("SenderConfig", "dimse_timeout", "C-STORE response (SCU)", "s"),
    ("SenderConfig", "network_timeout", "network inactivity (SCU)", "s"),
    ("RetryPolicy", "base_delay", "first delivery retry after", "s"),
    ("RetryPolicy", "max_delay", "longest delay between delivery tries", "s"),
    ("RetryPolicy", "max_tries", "delivery tries before dead-lettering", ""),
    ("ServiceConfig", "quiet_period", "study grouped when no instance arrived for", "s"),
)


#: Association rejections of the SCP (A-ASSOCIATE-RJ result, source, reason; PS3.8 9.3.4).
REJECTIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "called AE title is not ours (unless `require_called_ae = false`)",
        "rejected-permanent",
        "service user",
        "7: called AE title not recognised",
    ),
    (
        "calling AE title (and host) not in `allowed_callers`",
        "rejected-permanent",
        "service user",
        "3: calling AE title not recognised",
    ),
    (
        "more than `maximum_associations` associations",
        "rejected-transient",
        "service provider (presentation)",
        "2: local limit exceeded",
    ),
)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else "(private or retired)"


def _default(cls_name: str, name: str) -> object:
    from . import config

    cls = getattr(config, cls_name)
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _fmt(value: object, unit: str) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}"
    if isinstance(value, int) and value >= 2**20 and value % 2**20 == 0:
        return f"{value} ({value // 2**20} {'MiB' if unit == 'bytes' else 'Mi'})"
    return str(value)


def _code(concept: object) -> str:
    return (
        f"({concept.value}, {concept.scheme_designator}, "  # type: ignore[attr-defined]
        f'"{concept.meaning}")'  # type: ignore[attr-defined]
    )


def _sop_class_table() -> str:
    from .scp import supported_contexts
    from .triage import CANDIDATE_SOP_CLASSES

    rows = []
    for uid, _ in supported_contexts():
        role = "analysed (frontal chest)" if uid in CANDIDATE_SOP_CLASSES else "stored, skipped"
        if uid == "1.2.840.10008.1.1":
            role = "C-ECHO"
        rows.append((_uid_name(uid), f"`{uid}`", "SCP", role))
    return _table(("SOP Class", "UID", "Role", "What happens"), rows)


def _ts_table(syntaxes: Sequence[str]) -> str:
    return _table(
        ("#", "Transfer Syntax", "UID"),
        ((i, _uid_name(ts), f"`{ts}`") for i, ts in enumerate(syntaxes, 1)),
    )


def _limits_table() -> str:
    rows = []
    for cls_name, name, meaning, unit in LIMITS:
        section = {
            "ScpConfig": "[scp]",
            "SenderConfig": "(derived)",
            "RetryPolicy": "[retry]",
            "ServiceConfig": "(top level)",
        }[cls_name]
        rows.append((f"`{name}` {section}", meaning, _fmt(_default(cls_name, name), unit), unit))
    return _table(("Setting", "Limit", "Default", "Unit"), rows)


def _status_table() -> str:
    from .scp import STATUS_CODES

    return _table(
        ("Status", "Meaning", "When"),
        ((f"0x{code:04X}", meaning, when) for code, (meaning, when) in STATUS_CODES.items()),
    )


def _charset_table() -> str:
    from pydicom.charset import python_encoding

    terms = sorted(t for t in python_encoding if t)
    return ", ".join(f"`{t}`" for t in terms)


def _codes_table() -> str:
    from dicom_covid.results import codes

    rows = [
        ("Procedure reported", _code(codes.PROCEDURE_CHEST_XRAY)),
        ("Document title", _code(codes.MEASUREMENT_REPORT_TITLE)),
        ("Finding type", _code(codes.COVID19)),
        ("Qualitative evaluation, suspected", _code(codes.outcome_code("suspected"))),
        ("Qualitative evaluation, not suspected", _code(codes.outcome_code("not_suspected"))),
        ("Qualitative evaluation, indeterminate", _code(codes.outcome_code("indeterminate"))),
    ]
    for outcome, concept in codes.SCREENING_OUTCOME.items():
        rows.append(
            (f"Measurement naming the outcome ({outcome}), value P(COVID-19)", _code(concept))
        )
    for label, concept in codes.PROBABILITY_CODES.items():
        rows.append((f"Measurement: probability of '{label}'", _code(concept)))
    rows += [
        ("Measurement: operating threshold", _code(codes.THRESHOLD)),
        ("Unit of every measurement", _code(codes.PERCENT)),
        ("Algorithm family (TID 4019)", _code(codes.ALGORITHM_FAMILY)),
        ("Disclaimer and notes (TEXT)", _code(codes.DISCLAIMER_COMMENT)),
    ]
    return _table(("Content item", "Code (value, scheme, meaning)"), rows)


def _reasons_table() -> str:
    from dicom_covid.abstention import REASONS

    return _table(("Reason code", "Meaning"), ((f"`{k}`", v) for k, v in REASONS.items()))


def render() -> str:
    """The conformance statement as Markdown (what ``docs/conformance.md`` must contain)."""
    import pynetdicom
    from pydicom.uid import (
        ComprehensiveSRStorage,
        ExplicitVRLittleEndian,
        KeyObjectSelectionDocumentStorage,
        SecondaryCaptureImageStorage,
    )

    from dicom_covid import __version__
    from dicom_covid.results import codes
    from dicom_covid.results.common import (
        MANUFACTURER,
        SC_SERIES_DESCRIPTION,
        SC_SERIES_NUMBER,
        SR_SERIES_DESCRIPTION,
        SR_SERIES_NUMBER,
    )
    from dicom_covid.results.kos import KOS_SERIES_DESCRIPTION, KOS_SERIES_NUMBER, KOS_TITLE

    from . import config
    from .config import DEFAULT_AE_TITLE, DEFAULT_PORT, StowDestination
    from .scp import TRANSFER_SYNTAXES, supported_contexts
    from .sender import STOW_MAX_BYTES, proposed_transfer_syntaxes
    from .worker import FALLBACK_CHARSET

    verification_ts = supported_contexts()[0][1]
    n_storage = len(supported_contexts()) - 1
    # results are written Explicit VR Little Endian (highdicom SR default; SC set explicitly)
    scu_ts = proposed_transfer_syntaxes(str(ExplicitVRLittleEndian))
    scu_rows = [
        (_uid_name(uid), f"`{uid}`", "SCU", what)
        for uid, what in (
            (str(ComprehensiveSRStorage), "TID 1500 result, one per analysed image"),
            (str(SecondaryCaptureImageStorage), "Grad-CAM heat map, one per analysed image"),
            (
                str(KeyObjectSelectionDocumentStorage),
                "only with `kos_for_suspected`: one per image whose outcome is suspected",
            ),
        )
    ]
    toml_example = (config.__doc__ or "").split("::", 1)[1].split('"""')[0].rstrip()
    toml_example = "\n".join(
        line[4:] if line.startswith("    ") else line
        for line in toml_example.strip("\n").splitlines()
    )
    abstention_code = _code(codes.INDETERMINATE)
    stow_max_mib = STOW_MAX_BYTES // 2**20
    stow_timeout = StowDestination.timeout

    return f"""<!-- GENERATED by `dicom-covid conformance --output docs/conformance.md` from the
     code (pacs_listener/conformance.py). Do not edit by hand: tests/test_conformance.py fails
     when this file and the code disagree. -->

# DICOM Conformance Statement — dicom-covid {__version__}

**RESEARCH USE ONLY — NOT FOR DIAGNOSTIC USE.** dicom-covid is not a medical device. Its
results are never a diagnosis.

Structure after DICOM PS3.2 (Conformance), Annex A.

## 1 Overview

`dicom-covid serve` is a DICOM node (one Application Entity) that a PACS forwards chest X-ray
studies to. It receives instances as a **Storage SCP**, analyses every frontal chest CR/DX image
(or X-ray Secondary Capture) with a convolutional network, and sends two new objects per analysed
image back into the same study as a **Storage SCU** (C-STORE) or a **STOW-RS user agent**
(DICOMweb): a Comprehensive SR (TID 1500 Measurement Report) and a Secondary Capture with the
Grad-CAM heat map.

| Networking | SOP classes | User of service (SCU) | Provider of service (SCP) |
|---|---|---|---|
| Verification | Verification | no | yes |
| Transfer | {n_storage} storage SOP classes (table 4.2.1-1) | no | yes |
| Transfer | Comprehensive SR Storage | yes | yes |
| Transfer | Secondary Capture Image Storage | yes | yes |
| Transfer | Key Object Selection Document Storage (optional) | yes | yes |

| Web service | Resource | User agent | Origin server |
|---|---|---|---|
| STOW-RS (PS3.18 10.5) | Studies (`POST`, `application/dicom` parts) | yes | no |

No media storage application profile is supported. Query/Retrieve, Worklist, MPPS, Storage
Commitment and the other DICOMweb services (QIDO-RS, WADO-RS, UPS-RS) are not supported.

## 2 Table of contents

1. Overview · 2. Contents · 3. Introduction · 4. Networking (implementation model, AE
specifications, network interfaces, configuration) · 5. Media interchange · 6. Support of
character sets · 7. Security · 8. Annexes (IOD contents: SR template, SC; coded terminology)

## 3 Introduction

Audience: PACS administrators and integrators. Readers should know DICOM PS3.2, PS3.4, PS3.7,
PS3.8 and PS3.16 (TID 1500). Every table of this document is generated from the code of the
version named in the title, with its default configuration; a site may change the
configurable values (section 4.4).

## 4 Networking

### 4.1 Implementation model

#### 4.1.1 Application data flow

```
PACS / modality ──C-STORE──► [dicom-covid SCP] ──► spool + job store (SQLite, durable)
                                                       │  study quiet for quiet_period
                                                       ▼
                                          [worker process: classifier, Grad-CAM]
                                                       │  SR + SC written
                                                       ▼
 destination(s) ◄──C-STORE── [dicom-covid SCU (sender)]   (or an output folder)
 DICOMweb server(s) ◄──STOW-RS──┘
```

* **Receiving** (real-world activity: a PACS forwards a study). Each instance is written to disk
  and recorded before it is acknowledged. Instances that are not frontal chest radiographs are
  acknowledged and skipped. A study becomes a job when no instance of it arrived for
  `quiet_period` seconds.
* **Analysing** (local, no DICOM). A separate worker process classifies each candidate image and
  writes the SR and the SC.
* **Sending** (real-world activity: results are ready). Results are sent to every configured
  destination over a new association (to a DICOMweb server: STOW-RS requests), retried with
  exponential backoff while a destination is unreachable, and dead-lettered after `max_tries`
  tries (re-queued by `dicom-covid retry`). Delivery is at least once, always with the same SOP
  Instance UIDs.

#### 4.1.2 Functional definition of the AE

One AE, by default titled `{DEFAULT_AE_TITLE}`, on TCP port {DEFAULT_PORT}, plays both roles. It
accepts associations from the configured callers and originates associations only to deliver
results. The association acceptor and the sender run in the service process; the classifier runs
in a separate worker process started by it.

#### 4.1.3 Sequencing of real-world activities

Results of an image can only be sent after the study containing it was quiet for
`quiet_period` seconds and the image was analysed. Instances of a study arriving after its job
was created form a further job.

### 4.2 AE specification

#### 4.2.1 SOP classes

The AE is SCP of Verification and of the storage SOP classes below (pynetdicom's
`AllStoragePresentationContexts`), and SCU of the two result SOP classes.

**Table 4.2.1-1 — SOP classes accepted (SCP).** "analysed" SOP classes become jobs when the
header says frontal chest CR/DX (Secondary Capture: modality CR, DX, OT or empty), single frame,
grayscale; everything else is acknowledged (0x0000) and recorded as skipped with a reason.

{_sop_class_table()}

**Table 4.2.1-2 — SOP classes proposed (SCU).**

{_table(("SOP Class", "UID", "Role", "What"), scu_rows)}

#### 4.2.2 Association policies

**General.** Application Context Name `1.2.840.10008.3.1.1.1`. Implementation Class UID
`{pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}`, Implementation Version Name
`{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}` (pynetdicom {pynetdicom.__version__}).
SCP/SCU Role Selection and extended negotiation are not used; asynchronous operations are not
supported (one operation at a time per association).

**Number of associations and limits.** Defaults; each is a setting (section 4.4):

{_limits_table()}

Before an association is handed to the DICOM upper layer, a connection guard gives the peer
`associate_timeout` seconds to complete the TLS handshake and the whole A-ASSOCIATE-RQ, refuses
a request announced larger than `maximum_associate_rq_size` with an A-ABORT (source: service
provider, reason 6 "invalid PDU parameter value"), answers a first PDU other than
A-ASSOCIATE-RQ with an A-ABORT (reason 1 or 2), and drops the oldest pending connection of a
peer (or of all) when `maximum_pending_per_peer` (or `maximum_pending`) is reached. Only
negotiated associations count towards `maximum_associations`; more are rejected (transient,
service provider, "local limit exceeded").

**Association rejection reasons (SCP).**

{_table(("Situation", "Result", "Source", "Reason"), REJECTIONS)}

An empty `allowed_callers` (the default) accepts every calling AE title; configure it on any
network other than loopback.

#### 4.2.3 Association acceptance policy: Storage SCP

**Table 4.2.3-1 — Transfer syntaxes accepted for every storage SOP class**, in order of
preference (the SCP picks the first one the requestor proposes, so compressed images are kept as
the PACS holds them). Images are decoded later by pydicom with pylibjpeg, pyjpegls and
OpenJPEG.

{_ts_table([str(t) for t in TRANSFER_SYNTAXES])}

**Verification** accepts: {", ".join(f"`{t}` ({_uid_name(t)})" for t in verification_ts)}.

**Table 4.2.3-2 — C-STORE response statuses (SCP).**

{_status_table()}

C-ECHO is always answered 0x0000 (Success). A refused instance is never analysed; the sender
may send it again (0xA700 is transient). The SCP does not modify what it receives; it keeps the
received file until every result of its job is delivered (or for good with `keep_spool`).

#### 4.2.4 Association initiation policy: Storage SCU

The sender opens one association per destination and batch of due results. For each result SOP
class it proposes one presentation context with the transfer syntax of the result file followed
by the uncompressed ones:

{_ts_table(scu_ts)}

Results are written in Explicit VR Little Endian. The SCU treats 0x0000 and the warnings
0xB000, 0xB006, 0xB007 as stored; any other status, a rejected or aborted association, or no
answer within `dimse_timeout` counts as a failed try, retried after
`min(max_delay, base_delay x 2^(tries-1))` seconds. A result is marked delivered right after its
confirmation, so after a crash at most the one in flight is sent again, with the same SOP
Instance UID.

#### 4.2.5 STOW-RS user agent (DICOMweb)

A destination may be a STOW-RS resource (`[[stowrs]] url` or `--destination-stowrs`, e.g.
`http://pacs:8042/dicom-web/studies`). Due results go in `POST` requests with a
`multipart/related; type="application/dicom"` body, one Part 10 file per part, at most
{stow_max_mib} MiB per request (a larger file goes alone), `Accept: application/dicom+json`.
Authentication: none, HTTP basic (`basic_auth_file`: one line `user:password`) or a bearer token
(`token_file`), read from the file at every request. HTTPS verifies the server certificate
against `ca` or the system trust store. Redirects are not followed; proxy settings of the
environment are ignored.

What the answer means for each result of the request:

* **200 OK**: stored (listed in the Referenced SOP Sequence (0008,1199), or all without a list).
* **202 Accepted, 409 Conflict**: stored when listed in the Referenced SOP Sequence; when listed
  in the Failed SOP Sequence (0008,1198) a failed try, logged with its Failure Reason.
* **401, 403**: a failed try, reported as "refused our credentials" with the name of the
  credentials file.
* **Any other status, no connection, or no answer within `timeout`** (default
  {stow_timeout:g} s): a failed try.

Failed tries follow the same retries, backoff, dead-lettering and at-least-once rule as C-STORE
(section 4.2.4).

### 4.3 Network interfaces

TCP/IP (PS3.8), IPv4 and IPv6. The SCP listens on `host` (default 127.0.0.1: loopback only) and
`port`. Optional DICOM TLS (section 7).

### 4.4 Configuration

Settings come from `dicom-covid serve` options and an optional TOML file (options override the
file); `dicom-covid serve --help` lists the options. The file's keys, with their defaults:

```toml
{toml_example}
```

**AE title / address mapping.** The local AE title is `ae_title` (default `{DEFAULT_AE_TITLE}`),
used as called AE title by the SCP and as calling AE title by the SCU. Remote AEs: callers in
`allowed_callers` (`AE` or `AE@ip`), destinations in `destinations` (`AE@host:port`); DICOMweb
destinations are URLs (`[[stowrs]]`).

## 5 Media interchange

Not supported. Results may additionally be written to a folder (`output_dir`) as
`<StudyInstanceUID>/<SOPInstanceUID>.dcm` Part 10 files; this is not a DICOM media profile.

## 6 Support of character sets

Received instances are stored as they arrive, whatever their Specific Character Set (0008,0005).
The SR and SC copy the patient and study attributes, and the Specific Character Set, of their
source image. Terms decoded (pydicom):

{_charset_table()}

**Unknown character sets.** When the source image names a term that is not in this list, its
text is read as `{FALLBACK_CHARSET}` (ISO 8859-1, which decodes every byte, so nothing is lost),
the results are written with Specific Character Set `{FALLBACK_CHARSET}`, and a TEXT content item
{_code(codes.DISCLAIMER_COMMENT)} in the SR says so (letters outside ASCII in names may differ
from the source). The image is still analysed.

## 7 Security

* **DICOM TLS** (PS3.15 Annex B, optional; `[tls]` `cert`, `key`, `ca` or `--tls-*`): TLS 1.2 or
  later on the SCP and the SCU with the same identity. With `ca`, the SCP requires and verifies
  client certificates (mutual TLS) and the SCU verifies the destination's certificate and host
  name against it; without `ca`, the SCP asks for no client certificate and the SCU uses the
  system trust store.
* **Access control**: the calling AE allow-list, optionally bound to an IP address; the called
  AE title check; the connection limits of section 4.2.2.
* **Data at rest**: the state folder (received images, job store, results) is created with mode
  0700 and its files 0600.
* **Logs** carry UIDs, job ids, AE titles and peer addresses, never patient names or IDs.
* **DICOMweb delivery**: HTTPS with server certificate verification, HTTP basic or bearer
  credentials read from files (never logged; none in URLs: such a URL is refused).
* **Operations endpoint** (optional, `metrics_port`): plain HTTP on `metrics_host` (default
  loopback) serving `/metrics`, `/healthz`, `/readyz`, without patient data.

## 8 Annexes

### 8.1 IOD contents

Both objects are created in the study of the source image, each in a new series, with patient,
study and (when present) accession attributes copied from it, Manufacturer
`{MANUFACTURER}`, and the model identified in the Contributing Equipment Sequence (IHE AIR).
Their SOP Instance UIDs are derived from the source image's and the model's, so a result
re-sent or re-computed has the same UID.

#### 8.1.1 Comprehensive SR — TID 1500 Measurement Report

Series Number {SR_SERIES_NUMBER}, Series Description "{SR_SERIES_DESCRIPTION}". Completion
Completion Flag COMPLETE, Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY. Content
tree:

```
CONTAINER {_code(codes.MEASUREMENT_REPORT_TITLE)}  (TID 1500)
├─ HAS CONCEPT MOD  Language, Observer context: device (TID 1004), Procedure reported
│                   {_code(codes.PROCEDURE_CHEST_XRAY)}
├─ CONTAINER Imaging Measurements
│  └─ CONTAINER Measurement Group  (TID 1410 Planar ROI Measurements and Qualitative Evaluations)
│     ├─ Tracking identifier / UID
│     ├─ Image region: SCOORD POLYLINE (closed) around the Grad-CAM hot region, referencing
│     │  the source image
│     ├─ Finding type {_code(codes.COVID19)}
│     ├─ Algorithm identification (TID 4019): name, version, model and bundle version,
│     │  family {_code(codes.ALGORITHM_FAMILY)}
│     ├─ NUM  outcome measurement (value P(COVID-19) in %), then P(label) of every class, threshold
│     └─ CODE qualitative evaluation: COVID-19 = Suspected | Not suspected | Indeterminate
└─ CONTAINER Qualitative Evaluations
   └─ TEXT {_code(codes.DISCLAIMER_COMMENT)}: research-use disclaimer (and, when they apply, the
      abstention reasons and the character-set note)
```

**The three outcomes.** *Suspected*: P(COVID-19) reached the model's operating threshold
(chosen on the validation split, recorded in the bundle). *Not suspected*: it did not.
*Indeterminate* {abstention_code}: the model abstained (no COVID-19 verdict) for one or more of
these reasons, listed in the TEXT item:

{_reasons_table()}

#### 8.1.2 Secondary Capture Image

Series Number {SC_SERIES_NUMBER}, Series Description "{SC_SERIES_DESCRIPTION}". An RGB image
(Photometric Interpretation RGB, 8 bits) at a display resolution (the source's aspect ratio, long
side at most 1024 pixels; Pixel Spacing, when the source has one, scaled to the SC's matrix): the
radiograph in gray with the Grad-CAM heat map in a jet colour map, and burned-in text "NOT FOR
DIAGNOSTIC USE - RESEARCH ONLY", the outcome with P(COVID-19) and the threshold, the software,
model and bundle version. Burned In Annotation YES, Image Type DERIVED\\SECONDARY, Conversion
Type WSD, Source Image Sequence referencing the radiograph.

#### 8.1.3 Key Object Selection Document (optional)

Only with `kos_for_suspected = true` (or `--kos-for-suspected`), and only for an image whose
outcome is *Suspected* (never *Not suspected* or *Indeterminate*), so that worklists that read
KOS can raise the study's priority. Series Number {KOS_SERIES_NUMBER}, Series Description
"{KOS_SERIES_DESCRIPTION}". Document title {_code(KOS_TITLE)} (CID 7010; it has no "For
Attention" concept); content: the observer device (the model, TID 1004), a TEXT Key Object
Description with the outcome, P(COVID-19), the threshold and the research-use disclaimer, and
one IMAGE item referencing the source radiograph, which the Current Requested Procedure Evidence
Sequence lists too. Delivered like the SR and SC.

### 8.2 Coded terminology and templates

Private codes use the coding scheme `{codes.SCHEME}`, declared in the Coding Scheme
Identification Sequence of every SR.

{_codes_table()}

### 8.3 Grayscale image consistency, private transfer syntaxes, private attributes

No Grayscale Standard Display Function calibration; no private transfer syntaxes; no private
data elements are written.
"""
