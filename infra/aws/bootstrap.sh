#!/usr/bin/env bash
# One-time AWS setup for ray_cluster.yaml: a locked-down security group and the nodes' instance profiles.
#
#   DEEPFILL_S3_BUCKETS="<bucket> [<bucket> ...]" infra/aws/bootstrap.sh <admin-cidr> [vpc-id]
#   DEEPFILL_S3_BUCKETS="deepfill-ray-data deepfill-ray-mlflow" \
#     infra/aws/bootstrap.sh "$(curl -s https://checkip.amazonaws.com)/32"
#
# Security group "deepfill-ray-nodes" (the GroupName in ray_cluster.yaml), exactly two ingress rules:
#   - all traffic from members of the group itself (GCS, object manager, NCCL/gloo between nodes);
#   - SSH (22/tcp) from <admin-cidr> only, the address `ray up` and `ray dashboard` connect from: a single
#     address (a.b.c.d/32, or an IPv6 /128) or a private range (inside 10.0.0.0/8, 172.16.0.0/12,
#     192.168.0.0/16). Anything else, 0.0.0.0/0 and ::/0 included, is refused before any AWS call.
# Ray's launcher adds its own rules (including SSH from 0.0.0.0/0) only to a group that has none, so a group
# made here stays as it is.
#
# Instance profiles (the IamInstanceProfile names in ray_cluster.yaml), each a role of the same name with one
# inline policy; nodes get credentials from the instance metadata, never from keys in a config:
#   - deepfill-ray-worker: S3 on the buckets of DEEPFILL_S3_BUCKETS only (list the bucket, read/write/delete
#     its objects: shards, checkpoints, inference outputs). No EC2, no IAM.
#   - deepfill-ray-head: the same S3 access, plus what the Ray autoscaler needs to launch workers: describe
#     instances / types / images / subnets / security groups (read-only, not scopable), RunInstances,
#     TerminateInstances and CreateTags limited to instances tagged ray-cluster-name=deepfill-ray, and
#     iam:PassRole for the worker role only (to EC2).
# Reruns keep existing resources and rewrite the two inline policies, so narrowing DEEPFILL_S3_BUCKETS takes
# effect. A role made by an older version of this script (deepfill-ray-node, with EC2/S3 full access) is
# left alone: delete it yourself once no cluster uses it.
#
# Needs the AWS CLI v2 with credentials allowed to create security groups and IAM roles.
# Region: AWS_REGION, default us-west-2 (as in ray_cluster.yaml).
set -euo pipefail

GROUP_NAME=deepfill-ray-nodes
HEAD_PROFILE=deepfill-ray-head
WORKER_PROFILE=deepfill-ray-worker
CLUSTER_NAME=deepfill-ray
REGION="${AWS_REGION:-us-west-2}"

refuse() {
  echo "$1" >&2
  exit 2
}

CIDR="${1:?usage: DEEPFILL_S3_BUCKETS=\"bucket ...\" infra/aws/bootstrap.sh <admin-cidr, e.g. 203.0.113.7/32> [vpc-id]}"
SSH_HELP="pass your own address (e.g. 203.0.113.7/32) or a private range (inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
if [[ $CIDR =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})/([0-9]{1,2})$ ]]; then
  a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]} c=${BASH_REMATCH[3]} d=${BASH_REMATCH[4]} prefix=${BASH_REMATCH[5]}
  for octet in "$a" "$b" "$c" "$d"; do
    ((10#$octet <= 255)) || refuse "expected a CIDR such as 203.0.113.7/32, got '$CIDR'"
  done
  a=$((10#$a)) b=$((10#$b)) prefix=$((10#$prefix))
  if ((prefix > 32)); then
    refuse "expected a CIDR such as 203.0.113.7/32, got '$CIDR'"
  elif ((prefix == 32)); then
    :
  elif ((a == 10 && prefix >= 8)) || ((a == 172 && b >= 16 && b <= 31 && prefix >= 12)) ||
    ((a == 192 && b == 168 && prefix >= 16)); then
    :
  else
    refuse "refusing to open SSH to '$CIDR' (a public range or the whole internet); $SSH_HELP"
  fi
elif [[ $CIDR =~ ^[0-9A-Fa-f:]+/([0-9]{1,3})$ ]]; then
  [ "${BASH_REMATCH[1]}" = 128 ] || refuse "refusing to open SSH to '$CIDR'; an IPv6 address must be a /128"
  [[ $CIDR == *:* ]] || refuse "expected a CIDR such as 203.0.113.7/32, got '$CIDR'"
else
  refuse "expected a CIDR such as 203.0.113.7/32, got '$CIDR'"
fi

# The buckets the nodes may use: names only (no s3://, no wildcards), separated by spaces or commas.
read -r -a BUCKETS <<<"${DEEPFILL_S3_BUCKETS//,/ }"
((${#BUCKETS[@]} > 0)) || refuse "set DEEPFILL_S3_BUCKETS to the buckets the cluster uses, e.g. \"deepfill-ray-data deepfill-ray-mlflow\""
for bucket in "${BUCKETS[@]}"; do
  [[ $bucket =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] ||
    refuse "not an S3 bucket name: '$bucket' (names only, e.g. deepfill-ray-data; no s3://, no wildcards)"
done

# --- policies ---------------------------------------------------------------------------------------------
# JSON arrays of the bucket ARNs and of their object ARNs.
join_arns() {  # suffix: "" for buckets, "/*" for objects
  local out="" bucket
  for bucket in "${BUCKETS[@]}"; do out+="${out:+,}\"arn:aws:s3:::${bucket}$1\""; done
  printf '[%s]' "$out"
}
BUCKET_ARNS="$(join_arns "")"
OBJECT_ARNS="$(join_arns "/*")"

S3_STATEMENTS='{"Sid":"ListTheBuckets","Effect":"Allow","Action":["s3:ListBucket","s3:GetBucketLocation","s3:ListBucketMultipartUploads"],"Resource":'"$BUCKET_ARNS"'},
{"Sid":"ReadWriteTheirObjects","Effect":"Allow","Action":["s3:GetObject","s3:PutObject","s3:DeleteObject","s3:AbortMultipartUpload","s3:ListMultipartUploadParts"],"Resource":'"$OBJECT_ARNS"'}'

worker_policy() {
  printf '{"Version":"2012-10-17","Statement":[%s]}' "$S3_STATEMENTS"
}

head_policy() {  # $1: the worker role's ARN
  local tag="\"ec2:ResourceTag/ray-cluster-name\":\"$CLUSTER_NAME\""
  printf '%s' '{"Version":"2012-10-17","Statement":['"$S3_STATEMENTS"',
{"Sid":"AutoscalerDescribe","Effect":"Allow","Action":["ec2:DescribeInstances","ec2:DescribeInstanceTypes","ec2:DescribeImages","ec2:DescribeSubnets","ec2:DescribeSecurityGroups"],"Resource":"*"},
{"Sid":"LaunchTaggedWorkers","Effect":"Allow","Action":"ec2:RunInstances","Resource":"arn:aws:ec2:'"$REGION"':*:instance/*","Condition":{"StringEquals":{"aws:RequestTag/ray-cluster-name":"'"$CLUSTER_NAME"'"}}},
{"Sid":"LaunchFromTheseResources","Effect":"Allow","Action":"ec2:RunInstances","Resource":["arn:aws:ec2:'"$REGION"'::image/*","arn:aws:ec2:'"$REGION"':*:subnet/*","arn:aws:ec2:'"$REGION"':*:network-interface/*","arn:aws:ec2:'"$REGION"':*:volume/*","arn:aws:ec2:'"$REGION"':*:security-group/*","arn:aws:ec2:'"$REGION"':*:key-pair/*","arn:aws:ec2:'"$REGION"':*:spot-instances-request/*"]},
{"Sid":"TagAtLaunch","Effect":"Allow","Action":"ec2:CreateTags","Resource":["arn:aws:ec2:'"$REGION"':*:instance/*","arn:aws:ec2:'"$REGION"':*:volume/*"],"Condition":{"StringEquals":{"ec2:CreateAction":"RunInstances"}}},
{"Sid":"TagAndTerminateOwnWorkers","Effect":"Allow","Action":["ec2:CreateTags","ec2:TerminateInstances"],"Resource":"arn:aws:ec2:'"$REGION"':*:instance/*","Condition":{"StringEquals":{'"$tag"'}}},
{"Sid":"PassTheWorkerRole","Effect":"Allow","Action":"iam:PassRole","Resource":"'"$1"'","Condition":{"StringEquals":{"iam:PassedToService":"ec2.amazonaws.com"}}}]}'
}

VPC_ID="${2:-$(aws ec2 describe-vpcs --region "$REGION" --filters Name=isDefault,Values=true \
  --query 'Vpcs[0].VpcId' --output text)}"
if [ -z "$VPC_ID" ] || [ "$VPC_ID" = "None" ]; then
  echo "no default VPC in $REGION; pass a vpc-id as the second argument" >&2
  exit 2
fi

# --- security group ---------------------------------------------------------------------------------------
SG_ID="$(aws ec2 describe-security-groups --region "$REGION" \
  --filters "Name=vpc-id,Values=$VPC_ID" "Name=group-name,Values=$GROUP_NAME" \
  --query 'SecurityGroups[0].GroupId' --output text)"
if [ "$SG_ID" = "None" ] || [ -z "$SG_ID" ]; then
  SG_ID="$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" \
    --group-name "$GROUP_NAME" --description "deepfill-ray cluster nodes (intra-group + admin SSH)" \
    --tag-specifications "ResourceType=security-group,Tags=[{Key=ray-cluster-name,Value=$CLUSTER_NAME}]" \
    --query GroupId --output text)"
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" --ip-permissions \
    "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG_ID,Description=intra-cluster}]" \
    "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$CIDR,Description=admin-ssh}]" >/dev/null
  echo "created security group $GROUP_NAME ($SG_ID) in $VPC_ID: intra-group traffic + SSH from $CIDR"
else
  echo "security group $GROUP_NAME ($SG_ID) already exists in $VPC_ID; rules left as they are"
fi

# --- roles and instance profiles --------------------------------------------------------------------------
ensure_role() {  # $1: role (and instance profile) name
  if ! aws iam get-role --role-name "$1" >/dev/null 2>&1; then
    aws iam create-role --role-name "$1" --assume-role-policy-document \
      '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}' \
      >/dev/null
    echo "created IAM role $1"
  fi
  if ! aws iam get-instance-profile --instance-profile-name "$1" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$1" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$1" --role-name "$1"
    echo "created instance profile $1 (allow ~15 s to propagate before ray up)"
  fi
}

ensure_role "$WORKER_PROFILE"
ensure_role "$HEAD_PROFILE"
WORKER_ROLE_ARN="$(aws iam get-role --role-name "$WORKER_PROFILE" --query Role.Arn --output text)"
aws iam put-role-policy --role-name "$WORKER_PROFILE" --policy-name deepfill-ray-worker \
  --policy-document "$(worker_policy)"
aws iam put-role-policy --role-name "$HEAD_PROFILE" --policy-name deepfill-ray-head \
  --policy-document "$(head_policy "$WORKER_ROLE_ARN")"
echo "policies set: S3 on ${BUCKETS[*]}; the head may launch and terminate $CLUSTER_NAME workers"
echo "done: ray up ray_cluster.yaml"
