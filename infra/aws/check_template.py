"""Asserts the properties of infra/aws/template.yaml that an operator relies on.

Usage: python check_template.py TEMPLATE. Parses the template with cfn-lint's own loader (it
understands !Ref, !Sub, !GetAtt), prints each failed check and a count, and exits 1 when any
failed.
"""

import sys

from cfnlint.decode import decode

failures = []


passed = []


def check(ok, what):
    if ok:
        passed.append(what)
    else:
        print("FAILED  " + what)
        failures.append(what)


def as_list(value):
    return value if isinstance(value, list) else [value]


def sub_text(value):
    """The text of a resource ARN: a plain string, or the template string of a !Sub."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        target = value["Fn::GetAtt"]
        target = target if isinstance(target, list) else target.split(".")
        return "GetAtt:" + ".".join(target)
    return repr(value)


def of_type(resources, kind):
    return {name: r for name, r in resources.items() if r.get("Type") == kind}


def main(path):
    template, matches = decode(path)
    if template is None:
        for match in matches:
            print(match)
        print(f"FAILED  {path} does not parse")
        return 1
    resources = template.get("Resources", {})

    # The bucket: encrypted, public access blocked, versioned, work/ expiring.
    buckets = of_type(resources, "AWS::S3::Bucket")
    check(len(buckets) == 1, "exactly one S3 bucket")
    bucket_name, bucket = next(iter(buckets.items()), ("", {"Properties": {}}))
    props = bucket.get("Properties", {})
    sse = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration", [])
    algorithms = [r.get("ServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in sse]
    check(bool(algorithms) and all(a in ("AES256", "aws:kms", "aws:kms:dsse") for a in algorithms),
          f"bucket encrypted by default ({algorithms})")
    block = props.get("PublicAccessBlockConfiguration", {})
    flags = ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
    check(all(block.get(flag) is True for flag in flags), "bucket blocks all public access (4 flags true)")
    check(props.get("VersioningConfiguration", {}).get("Status") == "Enabled", "bucket versioning enabled")
    rules = props.get("LifecycleConfiguration", {}).get("Rules", [])
    expiring = [r for r in rules if r.get("Status") == "Enabled" and "ExpirationInDays" in r
                and (r.get("Prefix") == "work/" or r.get("Filter", {}).get("Prefix") == "work/")]
    check(len(expiring) == 1, "a lifecycle rule expires work/ (and only work/)")
    check(not any("ExpirationInDays" in r and not (r.get("Prefix") or r.get("Filter", {}).get("Prefix"))
                  for r in rules), "no lifecycle rule expires the whole bucket")

    # S3 -> preprocess, on inbox/ only, with a permission scoped to this bucket and account.
    functions = of_type(resources, "AWS::Lambda::Function")
    preprocess = [n for n, f in functions.items()
                  if f["Properties"].get("Environment", {}).get("Variables", {}).get("LAMBDA_BINARY")
                  == "darkroom-preprocess"]
    notifier = [n for n, f in functions.items()
                if f["Properties"].get("Environment", {}).get("Variables", {}).get("LAMBDA_BINARY")
                == "darkroom-notifier"]
    check(len(preprocess) == 1 and len(notifier) == 1, "one preprocess and one notifier function")
    lambda_targets = props.get("NotificationConfiguration", {}).get("LambdaConfigurations", [])
    check(len(lambda_targets) == 1, "the bucket notifies exactly one Lambda")
    for target in lambda_targets:
        key_rules = target.get("Filter", {}).get("S3Key", {}).get("Rules", [])
        prefixes = [r.get("Value") for r in key_rules if r.get("Name", "").lower() == "prefix"]
        check(prefixes == ["inbox/"], f"the notification's prefix filter is inbox/ ({prefixes})")
        check(target.get("Event") == "s3:ObjectCreated:*", "the notification is for s3:ObjectCreated:*")
        check(sub_text(target.get("Function")) == f"GetAtt:{preprocess[0] if preprocess else '?'}.Arn",
              "the notification invokes the preprocess function")
    permissions = of_type(resources, "AWS::Lambda::Permission")
    check(len(permissions) == 1, "one Lambda permission")
    for permission in permissions.values():
        p = permission["Properties"]
        check(p.get("Principal") == "s3.amazonaws.com" and p.get("Action") == "lambda:InvokeFunction",
              "the permission lets s3.amazonaws.com invoke")
        check(p.get("SourceAccount") == {"Ref": "AWS::AccountId"}, "the permission names the source account")
        check(sub_text(p.get("SourceArn")).endswith(":s3:::${BucketName}"),
              "the permission names the source bucket")
    check(permissions and all(n in as_list(bucket.get("DependsOn", [])) for n in permissions),
          "the bucket depends on the permission (S3 checks it when the notification is set)")

    # Functions: provided.al2023, handler bootstrap, logs to a group with retention.
    log_groups = of_type(resources, "AWS::Logs::LogGroup")
    for name, function in functions.items():
        p = function["Properties"]
        check(p.get("Runtime") == "provided.al2023" and p.get("Handler") == "bootstrap",
              f"{name}: provided.al2023, handler bootstrap")
        group = p.get("LoggingConfig", {}).get("LogGroup", {}).get("Ref")
        check(group in log_groups and "RetentionInDays" in log_groups[group]["Properties"],
              f"{name}: logs to its own log group with a retention")
        variables = p.get("Environment", {}).get("Variables", {})
        secret_refs = {k for k, v in variables.items() if "resolve:secretsmanager" in sub_text(v)}
        check(secret_refs == {"DARKROOM_NATS_NKEY_SEED"}
              and sub_text(variables["DARKROOM_NATS_NKEY_SEED"]).endswith(":SecretString:seed}}"),
              f"{name}: the NATS NKey seed (and nothing else) comes from Secrets Manager ({sorted(secret_refs)})")
        check(not {"DARKROOM_NATS_USER", "DARKROOM_NATS_PASSWORD"} & set(variables),
              f"{name}: a NATS user or password beside the NKey seed")
        check(not any(k in variables for k in ("AWS_ACCESS_KEY_ID", "DARKROOM_S3_ACCESS_KEY_ID")),
              f"{name}: no static AWS keys")
        # NATS over TLS only: required, and the bundled CA (when deploy bundles one) trusted.
        check(variables.get("DARKROOM_NATS_TLS_REQUIRED") == "true", f"{name}: DARKROOM_NATS_TLS_REQUIRED is \"true\"")
        check(variables.get("DARKROOM_NATS_TLS_CA_FILE")
              == {"Fn::If": ["NatsCaIsBundled", "/var/task/nats-ca.crt", {"Ref": "AWS::NoValue"}]},
              f"{name}: DARKROOM_NATS_TLS_CA_FILE is the bundled nats-ca.crt when NatsCaBundled")
        check(variables.get("DARKROOM_NATS_URL") == {"Ref": "NatsUrl"}, f"{name}: DARKROOM_NATS_URL is the NatsUrl parameter")

    # Failed asynchronous invocations go to the dead-letter queue.
    queues = of_type(resources, "AWS::SQS::Queue")
    check(len(queues) >= 1, "a dead-letter queue exists")
    configs = of_type(resources, "AWS::Lambda::EventInvokeConfig")
    configured = {c["Properties"]["FunctionName"].get("Ref") for c in configs.values()}
    check(configured == set(functions), f"every function has an EventInvokeConfig ({sorted(configured)})")
    for name, config in configs.items():
        p = config["Properties"]
        destination = sub_text(p.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination"))
        check(destination in {f"GetAtt:{q}.Arn" for q in queues}, f"{name}: on failure, to the queue")
        check("MaximumRetryAttempts" in p, f"{name}: MaximumRetryAttempts set")

    # IAM: exactly the actions each role needs, on the prefixes it needs.
    roles = of_type(resources, "AWS::IAM::Role")
    role_of = {n: functions[n]["Properties"]["Role"]["Fn::GetAtt"][0] for n in functions}
    allowed = {
        "darkroom-preprocess": {
            ("s3:GetObject", "/inbox/*"), ("s3:GetObjectVersion", "/inbox/*"), ("s3:PutObject", "/work/*"),
            ("s3:GetObject", "/outputs/*/receipt.json"), ("s3:PutObject", "/outputs/*/receipt.json"),
            ("logs:CreateLogStream", "log"), ("logs:PutLogEvents", "log"), ("sqs:SendMessage", "queue"),
        },
        "darkroom-notifier": {
            ("logs:CreateLogStream", "log"), ("logs:PutLogEvents", "log"), ("sqs:SendMessage", "queue"),
        },
    }

    def scope(resource):
        text = sub_text(resource)
        if text.startswith("GetAtt:") and text[7:].split(".")[0] in log_groups:
            return "log"
        if text.startswith("GetAtt:") and text[7:].split(".")[0] in queues:
            return "queue"
        if text.startswith("arn:${AWS::Partition}:s3:::${BucketName}/"):
            return text[len("arn:${AWS::Partition}:s3:::${BucketName}"):]
        return text

    for function_name, role_name in role_of.items():
        binary = functions[function_name]["Properties"]["Environment"]["Variables"]["LAMBDA_BINARY"]
        role = roles.get(role_name, {}).get("Properties", {})
        check(not role.get("ManagedPolicyArns"), f"{role_name}: no managed policies")
        granted = set()
        for policy in role.get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                check(statement.get("Effect") == "Allow" and "NotAction" not in statement
                      and "NotResource" not in statement and "Condition" not in statement
                      or statement.get("Effect") == "Deny",
                      f"{role_name}/{statement.get('Sid')}: a plain Allow")
                for action in as_list(statement.get("Action", [])):
                    check("*" not in action, f"{role_name}: action {action} has no wildcard")
                    for resource in as_list(statement.get("Resource", [])):
                        check(sub_text(resource) != "*", f"{role_name}: {action} not on Resource *")
                        granted.add((action, scope(resource)))
        check(granted == allowed[binary], f"{role_name} grants exactly {sorted(allowed[binary])}"
              + ("" if granted == allowed[binary] else f", not {sorted(granted)}"))

    for name, policy in of_type(resources, "AWS::IAM::ManagedPolicy").items():
        grants = {(a, scope(r)) for s in policy["Properties"]["PolicyDocument"]["Statement"]
                  for a in as_list(s["Action"]) for r in as_list(s["Resource"])}
        check(grants == {("s3:GetObject", "/work/*"), ("s3:PutObject", "/outputs/*")},
              f"{name}: the GPU workers read work/ and write outputs/, nothing else")

    # A bucket policy may only deny (here: requests without TLS).
    for name, policy in of_type(resources, "AWS::S3::BucketPolicy").items():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        check(all(s.get("Effect") == "Deny" for s in statements), f"{name}: only Deny statements")

    # NatsUrl takes tls:// URLs only (CloudFormation anchors AllowedPattern on the whole value).
    import re
    pattern = template.get("Parameters", {}).get("NatsUrl", {}).get("AllowedPattern", "")
    accepts = lambda url: re.fullmatch(pattern, url) is not None
    check(bool(pattern) and accepts("tls://a.example.net:4222") and accepts("tls://a:4222, tls://b:4222")
          and not accepts("nats://a.example.net:4222") and not accepts("tls://a:4222,nats://b:4222"),
          f"NatsUrl allows tls:// URLs only ({pattern!r})")
    conditions = template.get("Conditions", {})
    check(conditions.get("NatsCaIsBundled") == {"Fn::Equals": [{"Ref": "NatsCaBundled"}, "true"]},
          "condition NatsCaIsBundled is NatsCaBundled == true")

    for parameter in ("NatsUrl", "NatsCaBundled", "PreprocessNatsSecretArn", "NotifierNatsSecretArn", "BucketName",
                      "LogRetentionDays"):
        check(parameter in template.get("Parameters", {}), f"parameter {parameter}")

    if failures:
        print(f"{len(failures)} of {len(failures) + len(passed)} template checks failed")
        return 1
    print(f"all {len(passed)} template checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
