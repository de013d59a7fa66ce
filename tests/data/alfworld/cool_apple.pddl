;; task: put a cool apple in countertop
;; A kitchen corner: the apple waits in a closed cabinet, the fridge cools it, the countertop is the goal.
(define (problem cool_apple)
(:domain alfred)
(:objects
  agent1 - agent
  apple_bar_1 - object
  cabinet_bar_1 countertop_bar_1 fridge_bar_1 - receptacle
  loc_bar_0 loc_bar_1 loc_bar_2 loc_bar_3 - location
  AppleType - otype
  CabinetType CounterTopType FridgeType - rtype)
(:init
  (atLocation agent1 loc_bar_0)
  (receptacleAtLocation cabinet_bar_1 loc_bar_1)
  (receptacleAtLocation countertop_bar_1 loc_bar_2)
  (receptacleAtLocation fridge_bar_1 loc_bar_3)
  (receptacleType cabinet_bar_1 CabinetType)
  (receptacleType countertop_bar_1 CounterTopType)
  (receptacleType fridge_bar_1 FridgeType)
  (openable cabinet_bar_1)
  (openable fridge_bar_1)
  (inReceptacle apple_bar_1 cabinet_bar_1)
  (objectAtLocation apple_bar_1 loc_bar_1)
  (objectType apple_bar_1 AppleType)
  (pickupable apple_bar_1)
  (coolable apple_bar_1)
  (canContain CabinetType AppleType)
  (canContain CounterTopType AppleType)
  (canContain FridgeType AppleType))
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
  (coolable ?o) (objectType ?o AppleType) (receptacleType ?r CounterTopType) (isCool ?o) (inReceptacle ?o ?r)))))))
