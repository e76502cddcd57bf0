#!/usr/bin/env bash
# Start the MLflow tracking server for deepfill-ray: PostgreSQL backend store (runs, params, metrics, the
# model registry), artifacts in S3 served through the server (`--artifacts-destination`), so training and
# inference nodes need no bucket credentials of their own for MLflow. Authentication is on: MLflow's
# basic-auth app, configured by infra/mlflow/basic_auth.ini (default READ for signed-in users, 401 for
# anonymous requests).
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow
#   export PGPASSWORD=...                # libpq reads it (or ~/.pgpass): no password in the URI or in `ps`
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://deepfill-ray-mlflow/artifacts
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...       # from your secret store; creates the admin on first start
#   export MLFLOW_FLASK_SERVER_SECRET_KEY=...   # from your secret store (CSRF of the sign-up page)
#   infra/mlflow/start.sh
#
# Then point jobs at it: MLFLOW_TRACKING_URI=http://<host>:5000 with MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD of a non-admin user (README, "MLflow server").
# MLFLOW_AUTH_ADMIN_USERNAME defaults to admin; MLFLOW_AUTH_CONFIG_PATH to basic_auth.ini next to this script.
#
# Network: binds 127.0.0.1 unless MLFLOW_HOST says otherwise. To serve a Ray cluster, bind 0.0.0.0 on a host
# inside the cluster's network (e.g. the head node, inside the security group of infra/aws/bootstrap.sh) and
# list in MLFLOW_ALLOWED_HOSTS the exact host:port names clients use (checked against the Host header;
# wildcard patterns are refused here):
#   MLFLOW_HOST=0.0.0.0 MLFLOW_ALLOWED_HOSTS='mlflow.internal:5000,10.0.1.17:5000' infra/mlflow/start.sh
# S3-compatible stores (MinIO, Ceph): set MLFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL). Keys come from the
# standard AWS environment / instance profile, never from this script.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@db.internal:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://deepfill-ray-mlflow/artifacts}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (from your secret store): the password of the admin user}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (from your secret store), e.g. openssl rand -hex 32}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/basic_auth.ini}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-localhost:${PORT},127.0.0.1:${PORT}}"
WORKERS="${MLFLOW_WORKERS:-4}"

case "$ALLOWED_HOSTS" in
  *'*'* | *'?'* | *'['*)
    echo "refusing MLFLOW_ALLOWED_HOSTS='$ALLOWED_HOSTS': list exact host:port names, no patterns" >&2
    exit 2
    ;;
esac
if [ ! -r "$MLFLOW_AUTH_CONFIG_PATH" ]; then
  echo "no auth config at MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH" >&2
  exit 2
fi

exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "$HOST" \
  --port "$PORT" \
  --allowed-hosts "$ALLOWED_HOSTS" \
  --workers "$WORKERS"
