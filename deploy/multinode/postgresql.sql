-- The job store database of a multi-node dicom-covid service (run once, as a superuser):
--   psql -h db.hospital.example -U postgres -f deploy/multinode/postgresql.sql
-- dicom-covid creates its tables on first start (and migrates them on upgrade).
CREATE ROLE dicomcovid LOGIN PASSWORD 'change me';  -- then put it in each node's PGPASSFILE
CREATE DATABASE dicomcovid OWNER dicomcovid;
-- pg_hba.conf: allow only the dicom-covid nodes, with scram-sha-256 (and TLS: add
-- "?sslmode=verify-full" to job_store and the server's CA to ~/.postgresql/root.crt), e.g.
--   hostssl  dicomcovid  dicomcovid  10.0.0.0/24  scram-sha-256
