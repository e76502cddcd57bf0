#!/usr/bin/env bash
# Start the MLflow tracking server for deepfill-ray: PostgreSQL backend store (runs, params, metrics, the
# model registry), artifacts in S3 served through the server (`--artifacts-destination`), so training and
# inference nodes need no bucket credentials of their own for MLflow.
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow
#   export PGPASSWORD=...                # libpq reads it (or ~/.pgpass): no password in the URI or in `ps`
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://deepfill-ray-mlflow/artifacts
#   infra/mlflow/start.sh
#
# Then point jobs at it: MLFLOW_TRACKING_URI=http://<host>:5000.
#
# Network: binds 127.0.0.1 unless MLFLOW_HOST says otherwise. To serve a Ray cluster, bind 0.0.0.0 on a host
# inside the cluster's network (e.g. the head node, inside the security group of infra/aws/bootstrap.sh) and
# list the names clients use in MLFLOW_ALLOWED_HOSTS (checked against the Host header):
#   MLFLOW_HOST=0.0.0.0 MLFLOW_ALLOWED_HOSTS='10.*,mlflow.internal,mlflow.internal:5000' infra/mlflow/start.sh
# S3-compatible stores (MinIO, Ceph): set MLFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL). Keys come from the
# standard AWS environment / instance profile, never from this script.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@db.internal:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://deepfill-ray-mlflow/artifacts}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:${PORT},127.0.0.1,127.0.0.1:${PORT}}"
WORKERS="${MLFLOW_WORKERS:-4}"

exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "$HOST" \
  --port "$PORT" \
  --allowed-hosts "$ALLOWED_HOSTS" \
  --workers "$WORKERS"
