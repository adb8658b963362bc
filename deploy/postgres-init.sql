-- Run once by the postgres image on an empty data volume (deploy/docker-compose.yml): Prefect's own
-- database beside the alforge store (POSTGRES_DB), both owned by the alforge role.
CREATE DATABASE prefect OWNER alforge;
