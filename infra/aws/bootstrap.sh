#!/usr/bin/env bash
# One-time AWS setup for ray_cluster.yaml: a locked-down security group and the nodes' instance profile.
#
#   infra/aws/bootstrap.sh <admin-cidr> [vpc-id]
#   infra/aws/bootstrap.sh "$(curl -s https://checkip.amazonaws.com)/32"
#
# Security group "deepfill-ray-nodes" (the GroupName in ray_cluster.yaml), exactly two ingress rules:
#   - all traffic from members of the group itself (GCS, object manager, NCCL/gloo between nodes);
#   - SSH (22/tcp) from <admin-cidr> only, the address `ray up` and `ray dashboard` connect from.
# Ray's launcher adds its own rules (including SSH from 0.0.0.0/0) only to a group that has none, so a group
# made here stays as it is. 0.0.0.0/0 and ::/0 are refused.
#
# Instance profile "deepfill-ray-node" (the IamInstanceProfile in ray_cluster.yaml), for head and workers:
# EC2 (the head's autoscaler launches workers), S3 (shards, checkpoints, MLflow artifacts; nodes get
# credentials from the instance metadata, never from keys in a config) and iam:PassRole on itself.
# Narrow the S3 policy to your buckets for production use.
#
# Needs the AWS CLI v2 with credentials allowed to create security groups and IAM roles.
# Region: AWS_REGION, default us-west-2 (as in ray_cluster.yaml). Safe to rerun: existing resources are kept.
set -euo pipefail

GROUP_NAME=deepfill-ray-nodes
PROFILE_NAME=deepfill-ray-node
REGION="${AWS_REGION:-us-west-2}"

CIDR="${1:?usage: infra/aws/bootstrap.sh <admin-cidr, e.g. 203.0.113.7/32> [vpc-id]}"
case "$CIDR" in
  0.0.0.0/0 | ::/0)
    echo "refusing to open SSH to the whole internet ($CIDR); pass your own address, e.g. 203.0.113.7/32" >&2
    exit 2
    ;;
  */*) ;;
  *)
    echo "expected a CIDR such as 203.0.113.7/32, got '$CIDR'" >&2
    exit 2
    ;;
esac

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
    --tag-specifications "ResourceType=security-group,Tags=[{Key=ray-cluster-name,Value=deepfill-ray}]" \
    --query GroupId --output text)"
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" --ip-permissions \
    "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG_ID,Description=intra-cluster}]" \
    "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$CIDR,Description=admin-ssh}]" >/dev/null
  echo "created security group $GROUP_NAME ($SG_ID) in $VPC_ID: intra-group traffic + SSH from $CIDR"
else
  echo "security group $GROUP_NAME ($SG_ID) already exists in $VPC_ID; rules left as they are"
fi

# --- instance profile -------------------------------------------------------------------------------------
if ! aws iam get-role --role-name "$PROFILE_NAME" >/dev/null 2>&1; then
  aws iam create-role --role-name "$PROFILE_NAME" --assume-role-policy-document \
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}' \
    >/dev/null
  aws iam attach-role-policy --role-name "$PROFILE_NAME" --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess
  aws iam attach-role-policy --role-name "$PROFILE_NAME" --policy-arn arn:aws:iam::aws:policy/AmazonS3FullAccess
  ROLE_ARN="$(aws iam get-role --role-name "$PROFILE_NAME" --query Role.Arn --output text)"
  aws iam put-role-policy --role-name "$PROFILE_NAME" --policy-name pass-own-role --policy-document \
    "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iam:PassRole\",\"Resource\":\"$ROLE_ARN\"}]}"
  echo "created IAM role $PROFILE_NAME"
fi
if ! aws iam get-instance-profile --instance-profile-name "$PROFILE_NAME" >/dev/null 2>&1; then
  aws iam create-instance-profile --instance-profile-name "$PROFILE_NAME" >/dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$PROFILE_NAME" --role-name "$PROFILE_NAME"
  echo "created instance profile $PROFILE_NAME (allow ~15 s to propagate before ray up)"
fi
echo "done: ray up ray_cluster.yaml"
