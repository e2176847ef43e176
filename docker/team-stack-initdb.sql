-- MLflow's database beside Prefect's (docker/team-stack.compose.yaml); run once, on the cluster's first start.
CREATE DATABASE mlflow OWNER distilflow;
