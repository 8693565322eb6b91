//! What provisioning would do, resource by resource, as printed by `darkroom-infra plan`.

use std::fmt;

use darkroom_shared::topology::diff::FieldChange;

/// What to do with one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It does not exist: create it.
    Create,
    /// It exists with these fields different.
    Update(Vec<FieldChange>),
    /// It exists as wanted.
    NoChange,
    /// This tool does not manage it here; the text says who does.
    NotManaged(String),
}

/// One resource and its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Kind and name: `stream DARKROOM_JOBS`, `consumer DARKROOM_JOBS/inference`,
    /// `kv darkroom_jobs`, `bucket darkroom`, `lifecycle darkroom`, `notification darkroom`.
    pub resource: String,
    /// What to do.
    pub action: Action,
}

impl Item {
    /// Whether applying changes something.
    pub fn changes(&self) -> bool {
        matches!(self.action, Action::Create | Action::Update(_))
    }

    /// The changes that would lose data, refused without `--force`.
    pub fn refusals(&self) -> Vec<&FieldChange> {
        match &self.action {
            Action::Update(changes) => changes
                .iter()
                .filter(|change| change.data_loss.is_some())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Every resource, in the order `apply` handles them: streams, KV buckets, consumers, bucket,
/// lifecycle rule, notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The resources.
    pub items: Vec<Item>,
}

impl Plan {
    /// Whether applying changes anything.
    pub fn has_changes(&self) -> bool {
        self.items.iter().any(Item::changes)
    }

    /// Every data-losing change with its resource.
    pub fn refusals(&self) -> Vec<(&str, &FieldChange)> {
        self.items
            .iter()
            .flat_map(|item| {
                item.refusals()
                    .into_iter()
                    .map(move |change| (item.resource.as_str(), change))
            })
            .collect()
    }

    /// The item for `resource`, if planned.
    pub fn item(&self, resource: &str) -> Option<&Item> {
        self.items.iter().find(|item| item.resource == resource)
    }
}

impl fmt::Display for Plan {
    /// One line per resource (`create`, `update FIELD from A to B`, `no change`,
    /// `not managed (…)`), an indented line per refused change, then a summary line:
    /// `no changes`, or how many resources change and how many changes are refused.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.items {
            match &item.action {
                Action::Create => writeln!(f, "{}: create", item.resource)?,
                Action::NoChange => writeln!(f, "{}: no change", item.resource)?,
                Action::NotManaged(who) => writeln!(f, "{}: not managed ({who})", item.resource)?,
                Action::Update(changes) => {
                    let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
                    writeln!(f, "{}: update {}", item.resource, shown.join(", "))?;
                    for change in changes {
                        if let Some(why) = &change.data_loss {
                            writeln!(f, "    refused without --force: {}: {why}", change.field)?;
                        }
                    }
                }
            }
        }
        let changing = self.items.iter().filter(|item| item.changes()).count();
        if changing == 0 {
            writeln!(f, "no changes")
        } else {
            let refused = self.refusals().len();
            writeln!(
                f,
                "{changing} resource(s) to change, {refused} change(s) refused without --force"
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn change(data_loss: Option<&str>) -> FieldChange {
        FieldChange {
            field: "max_age",
            from: "7d".into(),
            to: "1d".into(),
            data_loss: data_loss.map(str::to_owned),
            recreate: false,
        }
    }

    #[test]
    fn an_up_to_date_plan_says_no_changes() {
        let plan = Plan {
            items: vec![
                Item {
                    resource: "stream S".into(),
                    action: Action::NoChange,
                },
                Item {
                    resource: "notification b".into(),
                    action: Action::NotManaged("elsewhere".into()),
                },
            ],
        };
        assert!(!plan.has_changes());
        assert_eq!(
            plan.to_string(),
            "stream S: no change\nnotification b: not managed (elsewhere)\nno changes\n"
        );
    }

    #[test]
    fn updates_list_fields_and_refusals() {
        let plan = Plan {
            items: vec![
                Item {
                    resource: "stream S".into(),
                    action: Action::Update(vec![change(Some("older messages deleted"))]),
                },
                Item {
                    resource: "kv k".into(),
                    action: Action::Create,
                },
            ],
        };
        assert!(plan.has_changes());
        assert_eq!(plan.refusals().len(), 1);
        assert_eq!(
            plan.to_string(),
            "stream S: update max_age from 7d to 1d\n    refused without --force: max_age: \
             older messages deleted\nkv k: create\n2 resource(s) to change, 1 change(s) \
             refused without --force\n"
        );
    }
}
