//! An ALB on moto: VPC, two subnets, stable and canary target groups with running instance
//! targets, a listener with a weighted, sticky default forward and a weighted rule.

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::config::{BehaviorVersion, Credentials, Region};
use elbv2::types::{
    Action, ActionTypeEnum, ForwardActionConfig, ProtocolEnum, RuleCondition, TargetDescription,
    TargetGroupStickinessConfig, TargetGroupTuple, TargetTypeEnum,
};
use rollback_responder::action::alb::{AlbExecutor, AlbTarget, AwsSettings, Scope, Stickiness};

use super::moto::{xml_values, Moto};

/// Listener default action as created: stable 75 / canary 25, sticky for 300 s.
pub const LISTENER_WEIGHTS: (i32, i32) = (75, 25);
/// Rule action as created: stable 10 / canary 90, sticky for 120 s.
pub const RULE_WEIGHTS: (i32, i32) = (10, 90);

pub struct AlbFixture {
    pub moto: Moto,
    pub elb: elbv2::Client,
    pub vpc_id: String,
    pub lb_arn: String,
    pub listener_arn: String,
    pub rule_arn: String,
    pub default_rule_arn: String,
    pub stable_tg: String,
    pub canary_tg: String,
    pub stable_instances: Vec<String>,
}

/// ELBv2 client for moto with static credentials and ring-based rustls.
pub fn elb_client(endpoint: &str) -> elbv2::Client {
    rollback_responder::tls::install_crypto_provider();
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let conf = elbv2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "static"))
        .endpoint_url(endpoint)
        .http_client(http)
        .build();
    elbv2::Client::from_conf(conf)
}

/// Fast retries so failure tests do not wait long.
pub fn fast_settings() -> AwsSettings {
    AwsSettings {
        max_attempts: 3,
        initial_backoff_ms: 10,
        ..AwsSettings::default()
    }
}

pub fn forward(groups: &[(&str, i32)], sticky_secs: Option<i32>) -> Action {
    let mut fc = ForwardActionConfig::builder();
    for (arn, w) in groups {
        fc = fc.target_groups(TargetGroupTuple::builder().target_group_arn(*arn).weight(*w).build());
    }
    let stickiness = match sticky_secs {
        Some(secs) => TargetGroupStickinessConfig::builder()
            .enabled(true)
            .duration_seconds(secs)
            .build(),
        None => TargetGroupStickinessConfig::builder().enabled(false).build(),
    };
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .forward_config(fc.target_group_stickiness_config(stickiness).build())
        .build()
}

impl AlbFixture {
    pub async fn start() -> AlbFixture {
        let moto = Moto::start().await;
        let elb = elb_client(&moto.endpoint);

        let vpc_id = xml_values(&moto.ec2("CreateVpc", &[("CidrBlock", "10.0.0.0/16")]).await, "vpcId").remove(0);
        let mut subnets = Vec::new();
        for (cidr, az) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
            let xml = moto
                .ec2(
                    "CreateSubnet",
                    &[("VpcId", &vpc_id), ("CidrBlock", cidr), ("AvailabilityZone", az)],
                )
                .await;
            subnets.push(xml_values(&xml, "subnetId").remove(0));
        }

        let lb = elb
            .create_load_balancer()
            .name("app")
            .set_subnets(Some(subnets.clone()))
            .send()
            .await
            .expect("CreateLoadBalancer");
        let lb_arn = lb.load_balancers()[0].load_balancer_arn().unwrap().to_string();

        let stable_tg = create_target_group(&elb, "stable", &vpc_id).await;
        let canary_tg = create_target_group(&elb, "canary", &vpc_id).await;
        let stable_instances = run_instances(&moto, &subnets[0], 2).await;
        let canary_instances = run_instances(&moto, &subnets[1], 1).await;
        register(&elb, &stable_tg, &stable_instances).await;
        register(&elb, &canary_tg, &canary_instances).await;

        let listener = elb
            .create_listener()
            .load_balancer_arn(&lb_arn)
            .protocol(ProtocolEnum::Http)
            .port(80)
            .default_actions(forward(
                &[(&stable_tg, LISTENER_WEIGHTS.0), (&canary_tg, LISTENER_WEIGHTS.1)],
                Some(300),
            ))
            .send()
            .await
            .expect("CreateListener");
        let listener_arn = listener.listeners()[0].listener_arn().unwrap().to_string();

        let rule = elb
            .create_rule()
            .listener_arn(&listener_arn)
            .priority(10)
            .conditions(RuleCondition::builder().field("path-pattern").values("/api/*").build())
            .actions(forward(
                &[(&stable_tg, RULE_WEIGHTS.0), (&canary_tg, RULE_WEIGHTS.1)],
                Some(120),
            ))
            .send()
            .await
            .expect("CreateRule");
        let rule_arn = rule.rules()[0].rule_arn().unwrap().to_string();

        let rules = elb
            .describe_rules()
            .listener_arn(&listener_arn)
            .send()
            .await
            .expect("DescribeRules");
        let default_rule_arn = rules
            .rules()
            .iter()
            .find(|r| r.is_default() == Some(true))
            .and_then(|r| r.rule_arn())
            .expect("default rule")
            .to_string();

        AlbFixture {
            moto,
            elb,
            vpc_id,
            lb_arn,
            listener_arn,
            rule_arn,
            default_rule_arn,
            stable_tg,
            canary_tg,
            stable_instances,
        }
    }

    pub fn executor(&self) -> AlbExecutor {
        AlbExecutor::new(elb_client(&self.moto.endpoint), &fast_settings())
    }

    pub fn listener_target(&self) -> AlbTarget {
        AlbTarget {
            listener_arn: self.listener_arn.clone(),
            rule_arn: None,
            stable_target_group_arn: self.stable_tg.clone(),
            stickiness: Stickiness::Keep,
            min_healthy_targets: 1,
            gradual: None,
            scope: Scope::One,
            canary_target_group_arns: Vec::new(),
        }
    }

    pub fn rule_target(&self) -> AlbTarget {
        AlbTarget {
            rule_arn: Some(self.rule_arn.clone()),
            ..self.listener_target()
        }
    }

    /// Listener default actions read straight from the SDK (independent of the module).
    pub async fn listener_actions(&self) -> Vec<Action> {
        self.elb
            .describe_listeners()
            .listener_arns(&self.listener_arn)
            .send()
            .await
            .expect("DescribeListeners")
            .listeners()[0]
            .default_actions()
            .to_vec()
    }

    /// Rule actions read straight from the SDK.
    pub async fn rule_actions(&self) -> Vec<Action> {
        self.rule(&self.rule_arn).await.actions().to_vec()
    }

    pub async fn rule(&self, arn: &str) -> elbv2::types::Rule {
        self.elb
            .describe_rules()
            .rule_arns(arn)
            .send()
            .await
            .expect("DescribeRules")
            .rules()[0]
            .clone()
    }

    /// Sets the listener's default forward to stable/canary weights behind the service's
    /// back (an operator or a deploy tool editing the ALB mid-test), keeping its stickiness.
    pub async fn set_listener_weights(&self, stable: i32, canary: i32) {
        let sticky = stickiness(&self.listener_actions().await);
        self.elb
            .modify_listener()
            .listener_arn(&self.listener_arn)
            .default_actions(forward(
                &[(&self.stable_tg, stable), (&self.canary_tg, canary)],
                sticky.0.then_some(sticky.1.unwrap_or(300)),
            ))
            .send()
            .await
            .expect("ModifyListener (test)");
    }

    /// Sets the rule's forward to stable/canary weights behind the service's back.
    pub async fn set_rule_weights(&self, stable: i32, canary: i32) {
        let sticky = stickiness(&self.rule_actions().await);
        self.elb
            .modify_rule()
            .rule_arn(&self.rule_arn)
            .actions(forward(
                &[(&self.stable_tg, stable), (&self.canary_tg, canary)],
                sticky.0.then_some(sticky.1.unwrap_or(120)),
            ))
            .send()
            .await
            .expect("ModifyRule (test)");
    }

    /// Adds a rule matching `path` at `priority` with `actions`; returns its ARN.
    pub async fn add_rule(&self, priority: i32, path: &str, actions: Action) -> String {
        let out = self
            .elb
            .create_rule()
            .listener_arn(&self.listener_arn)
            .priority(priority)
            .conditions(RuleCondition::builder().field("path-pattern").values(path).build())
            .actions(actions)
            .send()
            .await
            .expect("CreateRule (test)");
        out.rules()[0].rule_arn().expect("rule ARN").to_string()
    }

    /// Creates a target group with no targets.
    pub async fn empty_target_group(&self, name: &str) -> String {
        create_target_group(&self.elb, name, &self.vpc_id).await
    }

    /// Stops EC2 instances; moto then reports them as `unused` targets.
    pub async fn stop_instances(&self, ids: &[String]) {
        let keys: Vec<String> = (1..=ids.len()).map(|i| format!("InstanceId.{i}")).collect();
        let params: Vec<(&str, &str)> = keys.iter().zip(ids).map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.moto.ec2("StopInstances", &params).await;
    }
}

/// (target group ARN, weight) pairs of the only forward action in `actions`.
pub fn weights(actions: &[Action]) -> Vec<(String, i32)> {
    let fwd = actions
        .iter()
        .find(|a| a.r#type == Some(ActionTypeEnum::Forward))
        .expect("a forward action");
    fwd.forward_config
        .as_ref()
        .expect("forward config")
        .target_groups()
        .iter()
        .map(|t| (t.target_group_arn().unwrap().to_string(), t.weight().unwrap()))
        .collect()
}

/// (enabled, duration) of the forward's stickiness.
pub fn stickiness(actions: &[Action]) -> (bool, Option<i32>) {
    let fwd = actions
        .iter()
        .find(|a| a.r#type == Some(ActionTypeEnum::Forward))
        .expect("a forward action");
    let s = fwd
        .forward_config
        .as_ref()
        .and_then(|f| f.target_group_stickiness_config());
    (
        s.and_then(|s| s.enabled()).unwrap_or(false),
        s.and_then(|s| s.duration_seconds()),
    )
}

async fn create_target_group(elb: &elbv2::Client, name: &str, vpc_id: &str) -> String {
    elb.create_target_group()
        .name(name)
        .protocol(ProtocolEnum::Http)
        .port(80)
        .vpc_id(vpc_id)
        .target_type(TargetTypeEnum::Instance)
        .send()
        .await
        .expect("CreateTargetGroup")
        .target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string()
}

async fn run_instances(moto: &Moto, subnet: &str, count: u32) -> Vec<String> {
    let n = count.to_string();
    let xml = moto
        .ec2(
            "RunInstances",
            &[
                ("ImageId", "ami-12c6146b"),
                ("MinCount", &n),
                ("MaxCount", &n),
                ("SubnetId", subnet),
            ],
        )
        .await;
    let ids = xml_values(&xml, "instanceId");
    assert_eq!(ids.len(), count as usize, "RunInstances: {xml}");
    ids
}

async fn register(elb: &elbv2::Client, tg: &str, instances: &[String]) {
    let mut req = elb.register_targets().target_group_arn(tg);
    for id in instances {
        req = req.targets(TargetDescription::builder().id(id).port(80).build());
    }
    req.send().await.expect("RegisterTargets");
}
